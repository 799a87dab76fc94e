"""Run hooks: objects whose methods the interpreter calls at fixed points.

A hook is any object with some of these methods (all arguments keyword-only); missing methods
are skipped. Logging and progress bars are built on them.
"""

from __future__ import annotations

import sys
import time
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

    def on_validation(self, *, program: Any, step: int, metrics: dict[str, Any]) -> None:
        """After the validation callback ran at program step ``step``."""

    def on_checkpoint(self, *, program: Any, step: int, path: Any) -> None:
        """After a periodic checkpoint was written (atomically) to ``path``."""

    def on_run_end(self, *, program: Any, history: Any) -> None:
        """After the last step of a ``run`` call (also when it stops on an error)."""


_EVENTS = ("on_run_start", "on_step_end", "on_hypergrad", "on_validation", "on_checkpoint",
           "on_run_end")


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
    """A tqdm progress bar over the program steps of one ``run`` call.

    Its text shows the lowest level's step count and the latest loss of every level::

        mlodsl:  42%|####2     | 840/2000 [00:04<00:05, 196step/s, classifier step 840 | loss
        classifier 0.21, hpo 0.35]

    In a Jupyter notebook with ipywidgets installed it is a widget; elsewhere it is text on
    stderr. ``ml.program(..., progress=True)`` adds one; pass your own through ``hooks=`` (with
    ``progress=False``) to change its options.

    Args:
        file: Where the text bar goes (default stderr); giving one also rules out the widget.
        refresh_s: Least time between two updates of the losses shown (reading a loss waits
            for the device).
        leave: Keep the finished bar on screen.
    """

    def __init__(self, *, file: Any = None, refresh_s: float = 0.5, leave: bool = True) -> None:
        self.file = file
        self.refresh_s = refresh_s
        self.leave = leave
        self._bar: Any = None
        self._bottom = ""
        self._bottom_step = 0
        self._start = 0
        self._losses: dict[str, Any] = {}
        self._refreshed = 0.0

    def on_run_start(self, *, program: Any, steps: int) -> None:
        """Open a bar of ``steps`` program steps."""
        actions = program.schedule.actions
        self._bottom = next((a.level for a in actions if a.every == 1), actions[0].level)
        counts = program.steps
        self._start, self._bottom_step = counts["program"], counts[self._bottom]
        self._losses = {}
        self._refreshed = time.monotonic()
        self._bar = _tqdm(self.file)(total=steps, desc="mlodsl", unit="step", file=self.file,
                                     dynamic_ncols=True, leave=self.leave)

    def on_step_end(self, *, program: Any, level: str, step: int,
                    metrics: dict[str, Any]) -> None:
        """Advance to the record's program step; now and then, show the latest losses."""
        if self._bar is None:
            return
        if "loss" in metrics:
            self._losses[level] = metrics["loss"]  # a tensor: read only when shown
        if level == self._bottom:
            self._bottom_step = step
        done = int(metrics.get("global_step", self._start + self._bar.n)) - self._start
        if done > self._bar.n:
            self._bar.update(done - self._bar.n)
        now = time.monotonic()
        if now - self._refreshed >= self.refresh_s:
            self._refreshed = now
            self._bar.set_postfix_str(self.describe(), refresh=False)

    def describe(self) -> str:
        """The text after the bar: the lowest level's step and each level's latest loss."""
        losses = ", ".join(f"{name} {float(loss):.3g}" for name, loss in self._losses.items())
        return f"{self._bottom} step {self._bottom_step}" + (f" | loss {losses}" if losses else "")

    def on_run_end(self, *, program: Any, history: Any) -> None:
        """Show the final losses and close the bar (also when the run failed)."""
        if self._bar is not None:
            self._bar.set_postfix_str(self.describe(), refresh=False)
            self._bar.close()
            self._bar = None


def in_notebook() -> bool:
    """Whether this runs in a Jupyter kernel (notebook, JupyterLab, VS Code, Colab)."""
    zmqshell = sys.modules.get("ipykernel.zmqshell")
    ipython = sys.modules.get("IPython")
    if zmqshell is None or ipython is None:
        return False
    return isinstance(ipython.get_ipython(), zmqshell.ZMQInteractiveShell)


def _tqdm(file: Any) -> Any:
    """The widget bar in a notebook with ipywidgets, else the text bar (no warnings either way)."""
    if file is None and in_notebook():
        try:
            import ipywidgets  # noqa: F401  (tqdm.notebook needs it)
            from tqdm.notebook import tqdm as notebook_tqdm
            return notebook_tqdm
        except ImportError:
            pass
    from tqdm.std import tqdm
    return tqdm


def wants_progress(option: Any, steps: int) -> bool:
    """``progress=True`` always, ``False`` never, ``None``: on runs of 100+ steps when stderr is
    a terminal or the program runs in a notebook (never in logs, pipes or CI)."""
    if option is not None:
        return bool(option)
    stderr = sys.stderr
    interactive = (stderr is not None and stderr.isatty()) or in_notebook()
    return interactive and steps >= 100
