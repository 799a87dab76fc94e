"""Run hooks: objects whose methods the interpreter calls at fixed points.

A hook is any object with some of these methods (all arguments keyword-only); missing methods
are skipped. Logging and progress bars are built on them.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, Protocol


class Hook(Protocol):
    """The methods a hook may define. None is required."""

    def on_run_start(self, *, program: Any, steps: int) -> None:
        """Before the first step of a ``run`` call."""

    def on_step_end(self, *, program: Any, level: str, step: int,
                    metrics: dict[str, Any]) -> None:
        """After ``level`` took its ``step``-th step; ``metrics`` is its history record."""

    def on_hypergrad(self, *, program: Any, level: str, step: int, grads: Sequence[Any],
                     diagnostics: dict[str, Any]) -> None:
        """After ``level``'s hypergradient was computed, before it is applied."""

    def on_run_end(self, *, program: Any, history: Any) -> None:
        """After the last step of a ``run`` call (also when it stops on an error)."""


_EVENTS = ("on_run_start", "on_step_end", "on_hypergrad", "on_run_end")


class HookSet:
    """The hooks of a program, with each event's bound methods looked up once."""

    def __init__(self, hooks: Sequence[Any]) -> None:
        self.hooks = tuple(hooks)
        for event in _EVENTS:
            setattr(self, event, tuple(getattr(h, event) for h in hooks if hasattr(h, event)))

    def fire(self, event: str, **kwargs: Any) -> None:
        """Call every hook's ``event`` method with ``kwargs``."""
        for method in getattr(self, event):
            method(**kwargs)


class ProgressBar:
    """A tqdm progress bar over program steps, showing the latest loss of each level."""

    def __init__(self, every: int = 10) -> None:
        self._bar: Any = None
        self._every = every

    def on_run_start(self, *, program: Any, steps: int) -> None:
        try:
            from tqdm.auto import tqdm
        except ImportError as error:  # pragma: no cover - tqdm is a dependency
            raise ImportError("progress bars need tqdm: pip install tqdm") from error
        self._bar = tqdm(total=steps, desc="mlodsl", unit="step", dynamic_ncols=True)

    def on_step_end(self, *, program: Any, level: str, step: int,
                    metrics: dict[str, Any]) -> None:
        if level != program.schedule.actions[0].level:
            return
        self._bar.update(1)
        if self._bar.n % self._every == 0:
            self._bar.set_postfix({name: f"{program.history.last(name).get('loss', 0):.3g}"
                                   for name in program.history if program.history[name]},
                                  refresh=False)

    def on_run_end(self, *, program: Any, history: Any) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def wants_progress(option: Any, steps: int) -> bool:
    """``progress=True`` always, ``False`` never, ``None`` on long runs in a terminal/notebook."""
    if option is not None:
        return bool(option)
    interactive = sys.stderr.isatty() or "ipykernel" in sys.modules
    return interactive and steps >= 100
