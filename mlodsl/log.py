"""Loggers: hooks that send a program's metrics to TensorBoard, Weights & Biases or a callable.

Pass one (or a list) as ``ml.program(..., logger=...)``: ``"tensorboard"``, ``"wandb"``, a
:class:`TensorBoard` or :class:`WandB` with its options, a callable
``(metrics: dict[str, float], step: int) -> None``, or any hook object.

Every logger writes the same names. A level's step record goes out as ``<level>/<metric>``
(``hpo/loss``, ``classifier/acc``, ``hpo/hypergrad_norm``, ``hpo/hpo->classifier/residual``,
``hpo/lr``) every ``log_every`` steps of that level (``@ml.level(log_every=...)``); validation
metrics go out as ``val/<metric>`` each time validation runs. The step of every point is the
program step (steps of the lowest level), so all levels share one x axis.

Example:
    >>> program = ml.program(classifier, hpo, logger=ml.log.TensorBoard(log_dir="runs/hpo"))
    >>> program.run(steps=1000)       # then: tensorboard --logdir runs
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from mlodsl import errors
from mlodsl.errors import MissingDependencyError

LOGGERS = ("tensorboard", "wandb")
# Record entries that are coordinates, not metrics.
_NOT_METRICS = ("step", "global_step")
_HOOK_METHODS = ("on_run_start", "on_step_end", "on_hypergrad", "on_validation",
                 "on_checkpoint", "on_run_end")
_MISSING = ("{what} needs the {package} package, which is not installed. Install it with: "
            "pip install 'mlodsl[log]' (or pip install {package}).")

MetricsFn = Callable[[dict[str, float], int], None]


def _require(package: str, what: str) -> None:
    try:
        found = sys.modules.get(package, ...) is not None and \
            importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise MissingDependencyError(_MISSING.format(what=what, package=package))


def _scalar(value: Any) -> float | None:
    if isinstance(value, torch.Tensor):
        return float(value.detach()) if value.numel() == 1 else None
    if isinstance(value, (int, float)):  # bool included: a flag logs as 0/1
        return float(value)
    return None


def namespaced(prefix: str, metrics: Mapping[str, Any]) -> dict[str, float]:
    """``metrics`` as ``{"<prefix>/<name>": float}``: scalars only, nested dicts flattened,
    ``step``/``global_step`` left out.

    Example:
        >>> namespaced("hpo", {"loss": torch.tensor(0.5), "step": 3})
        {'hpo/loss': 0.5}
    """
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if key in _NOT_METRICS:
            continue
        if isinstance(value, Mapping):
            out.update(namespaced(f"{prefix}/{key}", value))
            continue
        number = _scalar(value)
        if number is not None:
            out[f"{prefix}/{key}"] = number
    return out


def program_config(program: Any) -> dict[str, Any]:
    """The program's structure as plain values (for a run's config in W&B)."""
    levels = {}
    for node in program.levels:
        lr = _scalar(node.optimizer.param_groups[0].get("lr"))
        levels[node.name] = {
            "params": sum(p.numel() for p in node.params),
            "optimizer": type(node.optimizer).__name__, "lr": lr,
            "upper_of": list(node.lowers), "grad": node.method.name if node.method else None,
            "inner_steps": node.inner_steps, "log_every": node.log_every,
        }
    return {"levels": levels}


class MetricsLogger:
    """A hook that namespaces a program's metrics and hands them to :meth:`write`.

    Subclasses implement :meth:`write` (and may override :meth:`open`, :meth:`flush` and
    :meth:`close`). The hook methods are what the interpreter calls.
    """

    def __init__(self) -> None:
        self._opened = False

    # -- what a backend provides ----------------------------------------------------------------

    def open(self, program: Any) -> None:
        """Called once, before the first metrics are written."""

    def write(self, metrics: dict[str, float], step: int) -> None:
        """Send ``metrics`` (namespaced names to floats) at program step ``step``."""
        raise NotImplementedError

    def flush(self) -> None:
        """Make what was written so far visible (called at the end of every ``run``)."""

    def close(self) -> None:
        """Flush and release the backend; a later ``run`` opens it again."""
        self._opened = False

    # -- hook methods -------------------------------------------------------------------------

    def _ensure_open(self, program: Any) -> None:
        if not self._opened:
            self.open(program)
            self._opened = True

    def on_run_start(self, *, program: Any, steps: int) -> None:
        """Open the backend on the first run."""
        self._ensure_open(program)

    def on_step_end(self, *, program: Any, level: str, step: int,
                    metrics: dict[str, Any]) -> None:
        """Write ``level``'s record as ``<level>/<metric>`` every ``log_every`` of its steps."""
        node = program.level(level)
        if step % node.log_every:
            return
        self._ensure_open(program)
        values = namespaced(level, metrics)
        lr = _scalar(node.optimizer.param_groups[0].get("lr"))
        if lr is not None:
            values[f"{level}/lr"] = lr
        self.write(values, int(metrics.get("global_step", step)))

    def on_validation(self, *, program: Any, step: int, metrics: dict[str, Any]) -> None:
        """Write validation metrics as ``val/<metric>``."""
        self._ensure_open(program)
        self.write(namespaced("val", metrics), int(step))

    def on_run_end(self, *, program: Any, history: Any) -> None:
        """Flush (the backend stays open: calling ``run`` again continues the same log)."""
        if self._opened:
            self.flush()


class TensorBoard(MetricsLogger):
    """Write scalars to TensorBoard event files (``tensorboard --logdir runs`` to view).

    Args:
        log_dir: Folder of the event files; default ``runs/<date>_<host>``.
        flush_secs: How often pending events are written to disk.

    Raises:
        MissingDependencyError: tensorboard is not installed.

    Example:
        >>> ml.program(classifier, hpo, logger=ml.log.TensorBoard(log_dir="runs/wd"))
    """

    def __init__(self, log_dir: str | None = None, *, flush_secs: int = 10) -> None:
        super().__init__()
        _require("tensorboard", "logger='tensorboard'")
        self._requested_dir = None if log_dir is None else str(log_dir)
        self._flush_secs = flush_secs
        self._writer: Any = None

    @property
    def log_dir(self) -> str | None:
        """Where the events go (known once the first run opened the writer)."""
        return self._writer.log_dir if self._writer is not None else self._requested_dir

    def open(self, program: Any) -> None:
        """Create the event file; record the program's description as text."""
        from torch.utils.tensorboard import SummaryWriter
        self._writer = SummaryWriter(log_dir=self._requested_dir, flush_secs=self._flush_secs)
        described = "\n".join("    " + line for line in str(program).splitlines())
        self._writer.add_text("mlodsl/program", described)

    def write(self, metrics: dict[str, float], step: int) -> None:
        """One scalar per metric at ``step``."""
        for name, value in metrics.items():
            self._writer.add_scalar(name, value, global_step=step)

    def flush(self) -> None:
        """Write pending events to disk."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Close the event file."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        super().close()


class WandB(MetricsLogger):
    """Log to Weights & Biases: ``wandb.init`` on the first run, ``run.log`` after each step.

    Offline mode is honoured (``mode="offline"``, or ``WANDB_MODE=offline`` in the environment);
    sync later with ``wandb sync``. The run's config holds each level's optimizer, learning
    rate, method and ``inner_steps``. Points are plotted against the program step (logged as
    ``global_step``). The run is finished by :meth:`close`, or when Python exits. (W&B writes
    the run's local files from a service process: they are complete once that stops, at exit
    or after ``wandb.teardown()``.)

    Args:
        project: The W&B project.
        name: The run's display name (default: W&B picks one).
        mode: ``"online"``, ``"offline"`` or ``"disabled"``; default: W&B's own setting.
        dir: Folder for W&B's local files.
        config: Extra config entries for the run.
        run: An already started ``wandb`` run to log into instead (left open by
            :meth:`close`).
        **init_kwargs: Anything else for ``wandb.init`` (``entity``, ``tags``, ``group``, ...).

    Raises:
        MissingDependencyError: wandb is not installed.

    Example:
        >>> logger = ml.log.WandB(project="mlodsl-digits", name="cg-wd", mode="offline")
        >>> ml.program(classifier, hpo, logger=logger).run(steps=1000)
    """

    def __init__(self, project: str | None = "mlodsl", name: str | None = None, *,
                 mode: str | None = None, dir: str | None = None,
                 config: Mapping[str, Any] | None = None, run: Any = None,
                 **init_kwargs: Any) -> None:
        super().__init__()
        if run is None:
            _require("wandb", "logger='wandb'")
        self._init = dict(project=project, name=name, mode=mode, dir=dir, **init_kwargs)
        self._config = dict(config or {})
        self._given_run = run
        self.run: Any = run

    def open(self, program: Any) -> None:
        """Start the run (unless one was given) and make ``global_step`` the x axis."""
        if self.run is None:
            import wandb
            init = {k: v for k, v in self._init.items() if v is not None}
            self.run = wandb.init(config={**program_config(program), **self._config}, **init)
        self.run.define_metric("global_step")
        self.run.define_metric("*", step_metric="global_step")

    def write(self, metrics: dict[str, float], step: int) -> None:
        """One ``run.log`` call with the metrics and ``global_step``."""
        self.run.log({**metrics, "global_step": step})

    def close(self) -> None:
        """Finish the run (a run passed in as ``run=`` is left open)."""
        if self.run is not None and self._given_run is None:
            self.run.finish()
            self.run = None
        super().close()


class Callback(MetricsLogger):
    """Send metrics to any function ``fn(metrics: dict[str, float], step: int) -> None``.

    Example:
        >>> rows = []
        >>> ml.program(classifier, hpo, logger=lambda metrics, step: rows.append((step, metrics)))
    """

    def __init__(self, fn: MetricsFn) -> None:
        super().__init__()
        self.fn = fn

    def write(self, metrics: dict[str, float], step: int) -> None:
        """Call the function."""
        self.fn(metrics, step)


_FACTORIES: dict[str, Callable[[], MetricsLogger]] = {"tensorboard": TensorBoard,
                                                      "wandb": WandB}


def loggers(option: Any) -> tuple[Any, ...]:
    """Turn the ``logger=`` program option into hook objects.

    Args:
        option: ``None``, ``"tensorboard"``, ``"wandb"``, a hook object (anything with
            ``on_step_end``, ``on_validation``, ...), a callable ``(metrics, step) -> None``,
            or a list of these.

    Returns:
        The hooks, in order.

    Raises:
        ValueError: an unknown logger name.
        TypeError: a value that is none of the above.
        MissingDependencyError: tensorboard or wandb is not installed.
    """
    if option is None:
        return ()
    if isinstance(option, str):
        if option not in _FACTORIES:
            raise ValueError(
                f"ml.program got logger={option!r}, which names no logger."
                f"{errors.did_you_mean(option, LOGGERS)} Loggers: {errors.listing(LOGGERS)}, "
                "or pass a callable (metrics, step) -> None or a logger object such as "
                "ml.log.TensorBoard(log_dir=...)."
            )
        return (_FACTORIES[option](),)
    if any(hasattr(option, method) for method in _HOOK_METHODS):
        return (option,)
    if callable(option):
        return (Callback(option),)
    if isinstance(option, Sequence):
        return tuple(hook for item in option for hook in loggers(item))
    raise TypeError(
        f"ml.program got logger of type {type(option).__name__}; pass 'tensorboard', 'wandb', "
        "a callable (metrics, step) -> None, a logger object (ml.log.TensorBoard(...), "
        "ml.log.WandB(...)) or a list of these."
    )
