"""Data streams: each level's batches, cycled forever with epochs counted."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from mlodsl.errors import LevelRuntimeError


def move_to(batch: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) batch to ``device``; other values pass through."""
    if isinstance(batch, torch.Tensor):
        return batch if batch.device == device else batch.to(device, non_blocking=True)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(move_to(x, device) for x in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(x, device) for x in batch)
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    return batch


class DataStream:
    """Yields a level's batches: from a re-iterable (cycled), a callable, or nothing.

    Attributes:
        epoch: Completed passes over a re-iterable.
        index: Batches taken in the current pass.
    """

    def __init__(self, data: Any, level: str, where: str, device: torch.device | None) -> None:
        self._data = data
        self._level = level
        self._where = where
        self._device = device
        self._iterable = data is not None and hasattr(type(data), "__iter__")
        self._iterator: Iterator[Any] | None = None
        self.epoch = 0
        self.index = 0

    def next(self) -> Any:
        """The next batch, moved to the program's device."""
        if self._data is None:
            return None
        if self._iterable:
            batch = self._next_from_iterable()
        else:
            batch = self._data()
        self.index += 1
        return batch if self._device is None else move_to(batch, self._device)

    def _next_from_iterable(self) -> Any:
        if self._iterator is None:
            self._iterator = iter(self._data)
        try:
            return next(self._iterator)
        except StopIteration:
            pass
        if self.index == 0:
            raise LevelRuntimeError(
                f"the data of level '{self._level}' ({self._where}) is empty: a full pass "
                "yielded no batch. Check the dataset and the DataLoader's drop_last."
            )
        self.epoch += 1
        self.index = 0
        self._iterator = iter(self._data)
        return next(self._iterator)
