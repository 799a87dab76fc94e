"""The run history: per-level records of losses, metrics and hypergradient figures."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch


def _number(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return value


class History(Mapping[str, list[dict[str, Any]]]):
    """Per-level lists of records, one per step of that level.

    Each record has ``step`` (the level's step count after the step), ``global_step``, ``loss``,
    every metric the level returned and, for upper levels, ``hypergrad_norm`` plus solver
    figures keyed ``"upper->lower/figure"``. Values are recorded as tensors (no device sync on
    the hot path) and turned into Python numbers when read.

    Example:
        >>> history = program.run(steps=100)
        >>> history.series("hpo", "loss")[-1]
    """

    def __init__(self, levels: tuple[str, ...]) -> None:
        self._records: dict[str, list[dict[str, Any]]] = {name: [] for name in levels}
        self._converted: dict[str, int] = {name: 0 for name in levels}

    def append(self, level: str, record: dict[str, Any]) -> None:
        """Add one record (values may be 0-d tensors)."""
        self._records[level].append(record)

    def __getitem__(self, level: str) -> list[dict[str, Any]]:
        records = self._records[level]
        for record in records[self._converted[level]:]:
            for key, value in record.items():
                record[key] = _number(value)
        self._converted[level] = len(records)
        return records

    def __iter__(self) -> Iterator[str]:
        return iter(self._records)

    def __len__(self) -> int:
        return len(self._records)

    def series(self, level: str, key: str) -> list[Any]:
        """One metric of one level over its steps (records without it are skipped)."""
        return [r[key] for r in self[level] if key in r]

    def last(self, level: str) -> dict[str, Any]:
        """The latest record of ``level`` (empty before its first step)."""
        records = self[level]
        return records[-1] if records else {}

    def __repr__(self) -> str:
        parts = []
        for name in self._records:
            last = self.last(name)
            shown = "no steps" if not last else f"{last['step']} steps, loss {last['loss']:.4g}"
            parts.append(f"{name}: {shown}")
        return f"History({'; '.join(parts)})"
