"""The run history: per-level records of losses, metrics and hypergradient figures."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from mlodsl.errors import MissingDependencyError


_CONVERT_EVERY = 256


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
        >>> history.to_pandas().groupby("level").loss.mean()   # one tidy table
        >>> history.plot()                                     # losses per level
    """

    def __init__(self, levels: tuple[str, ...]) -> None:
        self._records: dict[str, list[dict[str, Any]]] = {name: [] for name in levels}
        self._converted: dict[str, int] = {name: 0 for name in levels}
        #: Validation records: ``global_step`` plus the metrics the validation callback returned.
        self.validation: list[dict[str, Any]] = []

    def state_dict(self) -> dict[str, Any]:
        """All records as plain numbers (for checkpoints)."""
        return {"levels": {name: [dict(r) for r in self[name]] for name in self._records},
                "validation": [dict(r) for r in self.validation]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the records with :meth:`state_dict`'s."""
        for name in self._records:
            self._records[name] = [dict(r) for r in state["levels"].get(name, [])]
            self._converted[name] = len(self._records[name])
        self.validation = [dict(r) for r in state["validation"]]

    def append(self, level: str, record: dict[str, Any]) -> None:
        """Add one record (values may be 0-d tensors)."""
        records = self._records[level]
        records.append(record)
        # Turn tensors into numbers in batches: one sync per batch, and a long run does not
        # keep a tensor (and its allocator chunk) alive per metric per step.
        if len(records) - self._converted[level] >= _CONVERT_EVERY:
            self[level]

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

    def rows(self, levels: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """The history as one tidy table: a row per level step, in the order the steps ran.

        Each row is ``{"level": name, "step": ..., "global_step": ..., <metrics>...}``; a
        metric a level does not record is absent from its rows.

        Args:
            levels: Only these levels (default: all).

        Example:
            >>> program.history.rows()[:2]
            [{'level': 'classifier', 'step': 1, 'global_step': 1, 'loss': 2.31}, ...]
        """
        names = list(self._records) if levels is None else [self._known(n) for n in levels]
        rank = {name: i for i, name in enumerate(self._records)}  # bottom-up, as within a step
        rows = [{"level": name, **{k: r[k] for k in ("step", "global_step") if k in r}, **r}
                for name in names for r in self[name]]
        rows.sort(key=lambda row: (row.get("global_step", 0), rank[row["level"]]))
        return rows

    def to_pandas(self, levels: Iterable[str] | None = None) -> Any:
        """:meth:`rows` as a ``pandas.DataFrame`` (columns ``level``, ``step``,
        ``global_step``, ``loss``, then the other metrics).

        Raises:
            MissingDependencyError: pandas is not installed.
        """
        try:
            import pandas
        except ImportError as error:
            raise MissingDependencyError(
                "History.to_pandas() needs pandas, which is not installed. Install it with: "
                "pip install pandas (or use history.rows(), a list of dicts)."
            ) from error
        frame = pandas.DataFrame(self.rows(levels))
        first = [c for c in ("level", "step", "global_step", "loss") if c in frame.columns]
        return frame[first + [c for c in frame.columns if c not in first]]

    def plot(self, metric: str = "loss", *, levels: Iterable[str] | None = None,
             smooth: float = 0.0, logy: bool = False) -> Any:
        """Plot ``metric`` of each level against the program step, one panel per level.

        Args:
            metric: What to plot (``"loss"``, ``"hypergrad_norm"``, a metric a level returned).
            levels: Only these levels (default: every level that recorded ``metric``).
            smooth: Also draw an exponential moving average with this weight on the past
                (``0.9`` smooths strongly; ``0`` draws the raw values only).
            logy: Logarithmic y axes.

        Returns:
            The matplotlib ``Figure``.

        Raises:
            MissingDependencyError: matplotlib is not installed.
            ValueError: no level has recorded ``metric`` yet.

        Example:
            >>> fig = program.history.plot(smooth=0.9)
            >>> fig.savefig("losses.png")
        """
        try:
            import matplotlib.pyplot as plt
        except ImportError as error:
            raise MissingDependencyError(
                "History.plot() needs matplotlib, which is not installed. Install it with: "
                "pip install 'mlodsl[viz]' (or pip install matplotlib)."
            ) from error
        if not 0.0 <= smooth < 1.0:
            raise ValueError(f"plot(smooth={smooth!r}): use a weight in [0, 1)")
        names = list(self._records) if levels is None else [self._known(n) for n in levels]
        names = [name for name in names if self.series(name, metric)]
        if not names:
            raise ValueError(f"no level has recorded {metric!r} yet: run the program first, or "
                             f"plot one of the metrics it records")
        figure, axes = plt.subplots(len(names), 1, sharex=True, squeeze=False,
                                    figsize=(7.0, 0.8 + 2.0 * len(names)))
        for axis, name in zip(axes[:, 0], reversed(names)):  # top level in the top panel
            records = [r for r in self[name] if metric in r]
            x = [r["global_step"] for r in records]
            y = [float(r[metric]) for r in records]
            axis.plot(x, y, lw=1.0, alpha=0.35 if smooth else 1.0, color="C0")
            if smooth:
                average, smoothed = y[0], []
                for value in y:
                    average = smooth * average + (1.0 - smooth) * value
                    smoothed.append(average)
                axis.plot(x, smoothed, lw=1.5, color="C0")
            axis.set_ylabel(f"{name}\n{metric}")
            axis.set_yscale("log" if logy else "linear")
            axis.grid(alpha=0.3)
        axes[-1, 0].set_xlabel("program step")
        figure.tight_layout()
        return figure

    def _known(self, level: str) -> str:
        if level not in self._records:
            raise KeyError(f"no level {level!r} in this history; levels: "
                           f"{', '.join(self._records)}")
        return level

    def __repr__(self) -> str:
        parts = []
        for name in self._records:
            last = self.last(name)
            shown = "no steps" if not last else f"{last['step']} steps, loss {last['loss']:.4g}"
            parts.append(f"{name}: {shown}")
        return f"History({'; '.join(parts)})"
