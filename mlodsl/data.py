"""Data streams: each level's batches, cycled forever with epochs counted, resumable."""

from __future__ import annotations

import random
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


def rng_state(generator: torch.Generator | None = None) -> dict[str, Any]:
    """The random states an epoch's order can depend on (torch, Python, a loader's generator)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator | None = None) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    random.setstate(_as_python_random_state(state["python"]))
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


def _as_python_random_state(state: Any) -> tuple:
    # Checkpoints hold it as lists (weights_only loading); random.setstate needs tuples.
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


class DataStream:
    """Yields a level's batches: from a re-iterable (cycled), a callable, or nothing.

    A re-iterable's position is resumable: the random states in force when the current epoch
    began are kept, so a restored stream re-creates the same epoch order (a shuffling
    DataLoader's permutation included) and skips the batches already taken.

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
        self._epoch_rng: dict[str, Any] | None = None
        self._pending: list[Any] = []
        self.epoch = 0
        self.index = 0

    def next(self) -> Any:
        """The next batch, moved to the program's device."""
        if self._pending:  # batches of a step that did not complete are used again
            return self._pending.pop(0)
        if self._data is None:
            return None
        if self._iterable:
            batch = self._next_from_iterable()
        else:
            batch = self._data()
        self.index += 1
        return batch if self._device is None else move_to(batch, self._device)

    def push_back(self, *batches: Any) -> None:
        """Return ``batches`` to the stream: the next calls of :meth:`next` yield them again."""
        self._pending[:0] = batches

    def _next_from_iterable(self) -> Any:
        if self._iterator is None:
            self._start_epoch()
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
        self._start_epoch()
        return next(self._iterator)

    def _start_epoch(self) -> None:
        # A shuffling DataLoader draws its order from these states on iter() and the first
        # next(), which follow at once; keeping them makes the epoch reproducible.
        self._epoch_rng = rng_state(getattr(self._data, "generator", None))
        if hasattr(self._data, "set_epoch"):  # a sharded loader reshuffles per epoch
            self._data.set_epoch(self.epoch)
        self._iterator = iter(self._data)

    # -- checkpoints ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Position in the data (epoch, batch index, the epoch's random states)."""
        # Batches handed back are not consumed yet (they stay within the current epoch: an
        # epoch boundary inside one step's micro-batches is counted from the new epoch).
        index = max(self.index - len(self._pending), 0)
        state: dict[str, Any] = {"epoch": self.epoch, "index": index}
        if self._iterable and self._iterator is not None:
            state["epoch_rng"] = self._epoch_rng
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Move to a saved position; a re-iterable replays its epoch order and skips ahead."""
        self.epoch, self.index = state["epoch"], 0
        self._iterator, self._pending = None, []
        if not self._iterable or "epoch_rng" not in state:
            self.index = state["index"]
            return
        generator = getattr(self._data, "generator", None)
        current = rng_state(generator)
        try:
            set_rng_state(state["epoch_rng"], generator)
            self._start_epoch()
            # The first batch is drawn under the epoch's states too: a sampler picks its order
            # lazily, on the first next().
            for _ in range(max(state["index"], 1)):
                batch = next(self._iterator)
                self.index += 1
            if state["index"] == 0:
                self.push_back(batch if self._device is None else move_to(batch, self._device))
        finally:
            set_rng_state(current, generator)
