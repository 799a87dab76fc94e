"""Pieces shared by the digits examples that corrupt their training data
(`reweighting.py`, `hyper_cleaning.py`): a split as a named pair, label flipping, and running
torch on one thread."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NamedTuple

import torch

CLASSES = 10


class Split(NamedTuple):
    x: torch.Tensor
    y: torch.Tensor


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread: the matrices here are tiny, so a second thread buys nothing,
    and on busy cores threads waiting for each other made every step many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def flip_labels(y: torch.Tensor, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """A copy of ``y`` with exactly ``round(fraction * len(y))`` labels, chosen at random,
    replaced by a class drawn uniformly from the nine others."""
    noisy = y.clone()
    chosen = torch.randperm(len(y), generator=generator)[:round(fraction * len(y))]
    shift = torch.randint(1, CLASSES, (len(chosen),), generator=generator)
    noisy[chosen] = (y[chosen] + shift) % CLASSES
    return noisy
