"""Each rank's share of a level's data: the user's batch is the *global* batch.

A ``DataLoader`` over a map-style dataset is rebuilt around a batch sampler that draws the
global order (DistributedSampler semantics: a shuffling loader's order in epoch ``e`` is a
permutation seeded by ``seed + e``, identical on every rank, reshuffled each epoch through
:meth:`ShardedLoader.set_epoch`), cuts it into the loader's global batches and gives rank ``r``
the ``r``-th of ``world`` equal slices of each. The union of the ranks' ``k``-th batches is the
``k``-th global batch, so ``N`` ranks see exactly what one process with the same loader sees.
Other re-iterables (lists of batches) and callables yield global batches that are sliced along
their first dimension.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import (DataLoader, IterableDataset, RandomSampler, Sampler,
                              SequentialSampler)

from mlodsl.errors import DistributedError

_NOT_DIVISIBLE = (
    "level '{level}' ({where}): its {what} is {size}, the global batch, which the {world} "
    "ranks cannot split evenly (each rank takes an equal share, so that the mean of their "
    "losses is the global loss). {fix}"
)


class _GlobalOrderBatches(Sampler[list[int]]):
    """This rank's slice of each global batch, in the global order of the current epoch."""

    def __init__(self, sampler: Sampler, size: int, batch_size: int, drop_last: bool,
                 rank: int, world: int, seed: int) -> None:
        self.sampler, self.size, self.batch_size, self.drop_last = sampler, size, batch_size, \
            drop_last
        self.rank, self.world, self.seed = rank, world, seed
        self.epoch = 0

    def _order(self) -> list[int]:
        if isinstance(self.sampler, RandomSampler):
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            return torch.randperm(self.size, generator=generator).tolist()
        if isinstance(self.sampler, SequentialSampler):
            return list(range(self.size))
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(self.epoch)
        return list(self.sampler)  # must be the same on every rank (documented)

    def __iter__(self) -> Iterator[list[int]]:
        order = self._order()
        full = len(order) - len(order) % self.batch_size
        starts = range(0, full if self.drop_last else len(order), self.batch_size)
        for start in starts:
            batch = order[start:start + self.batch_size]
            share = len(batch) // self.world
            yield batch[self.rank * share:(self.rank + 1) * share]

    def __len__(self) -> int:
        if self.drop_last:
            return self.size // self.batch_size
        return -(-self.size // self.batch_size)


class ShardedLoader:
    """A level's ``DataLoader``, giving this rank its share of every global batch.

    Attributes:
        loader: The rank-local ``DataLoader`` (same dataset, collate function and workers).
        global_batch_size: The user's ``batch_size``.
    """

    def __init__(self, loader: DataLoader, batches: _GlobalOrderBatches) -> None:
        self._batches = batches
        self.global_batch_size = batches.batch_size
        kwargs: dict[str, Any] = dict(
            num_workers=loader.num_workers, collate_fn=loader.collate_fn,
            pin_memory=loader.pin_memory, timeout=loader.timeout,
            worker_init_fn=loader.worker_init_fn, generator=loader.generator,
            multiprocessing_context=loader.multiprocessing_context,
            persistent_workers=loader.persistent_workers)
        if loader.num_workers > 0:
            kwargs["prefetch_factor"] = loader.prefetch_factor
        self.loader = DataLoader(loader.dataset, batch_sampler=batches, **kwargs)

    def set_epoch(self, epoch: int) -> None:
        """Select epoch ``epoch``'s order (called by the data stream at each epoch start)."""
        self._batches.epoch = epoch

    def __iter__(self) -> Iterator[Any]:
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self._batches)


class _Sliced:
    """A callable returning a global batch, giving this rank's slice of it."""

    def __init__(self, data: Any, level: str, where: str, rank: int, world: int) -> None:
        self._data, self._level, self._where = data, level, where
        self._rank, self._world = rank, world

    def __call__(self) -> Any:
        return self._slice(self._data())

    def _slice(self, batch: Any) -> Any:
        def cut(t: Any) -> Any:
            if not isinstance(t, torch.Tensor) or t.ndim == 0:
                return t
            if t.shape[0] % self._world:
                raise DistributedError(_NOT_DIVISIBLE.format(
                    level=self._level, where=self._where, what="batch's first dimension",
                    size=t.shape[0], world=self._world,
                    fix=f"Make every batch's size a multiple of {self._world}."))
            share = t.shape[0] // self._world
            return t[self._rank * share:(self._rank + 1) * share]

        return torch.utils._pytree.tree_map(cut, batch)


class _SlicedIterable(_Sliced):
    """A re-iterable of global batches (a list of batches), giving this rank's slices."""

    def __iter__(self) -> Iterator[Any]:
        for batch in self._data:
            yield self._slice(batch)


def shard(data: Any, level: str, where: str, rank: int, world: int, seed: int) -> Any:
    """``data`` as this rank sees it (see the module docstring).

    Raises:
        DistributedError: the world size does not divide the global batch (or the last batch
            of an epoch), or the data cannot be sharded by index.
    """
    if data is None:
        return None
    if not isinstance(data, DataLoader):
        kind = _SlicedIterable if hasattr(type(data), "__iter__") else _Sliced
        return kind(data, level, where, rank, world)
    if isinstance(data.dataset, IterableDataset):
        raise DistributedError(
            f"level '{level}' ({where}) reads an IterableDataset, which mlodsl cannot shard by "
            "index. Use a map-style Dataset (with __getitem__ and __len__), or pass a callable "
            "returning the global batch, which every rank slices.")
    if data.batch_size is None:
        raise DistributedError(
            f"level '{level}' ({where}) has a DataLoader built with a custom batch_sampler; "
            "distributed runs need batch_size=... (the global batch) and a sampler.")
    size, batch = len(data.dataset), data.batch_size
    fix = f"Use a batch_size that is a multiple of {world}."
    if batch % world:
        raise DistributedError(_NOT_DIVISIBLE.format(
            level=level, where=where, what="DataLoader's batch_size", size=batch, world=world,
            fix=fix))
    last = size % batch
    if not data.drop_last and last % world:
        raise DistributedError(_NOT_DIVISIBLE.format(
            level=level, where=where, what=f"last batch of every epoch ({size} samples)",
            size=last, world=world,
            fix="Pass drop_last=True to the DataLoader, or use a dataset size or batch_size "
                f"that leaves a last batch divisible by {world}."))
    sampler = data.sampler
    if isinstance(sampler, RandomSampler) and (sampler.replacement
                                               or sampler.num_samples != size):
        raise DistributedError(
            f"level '{level}' ({where}) samples with replacement (or a subset) through a "
            "RandomSampler; distributed runs support shuffle=True/False and samplers that "
            "yield the same order on every rank.")
    return ShardedLoader(data, _GlobalOrderBatches(sampler, size, batch, data.drop_last,
                                                   rank, world, seed))


def describe(data: Any) -> str:
    """What every rank must agree on about a level's data (for the program comparison)."""
    if isinstance(data, ShardedLoader):
        batches = data._batches
        return (f"DataLoader(len={batches.size}, batch_size={batches.batch_size}, "
                f"drop_last={batches.drop_last}, sampler={type(batches.sampler).__name__})")
    if isinstance(data, _Sliced):
        return f"sliced {type(data._data).__name__}"
    return type(data).__name__
