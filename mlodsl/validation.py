"""Validation callbacks and early stopping."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mlodsl import errors

_RESERVED = ("program", "step")


@dataclass(frozen=True)
class EarlyStopping:
    """Stop a run when a validation metric stops improving.

    Args:
        metric: Name of a metric the validation callback returns.
        mode: ``"min"`` (lower is better) or ``"max"``.
        patience: Validations without improvement tolerated before stopping.
        min_delta: Smallest change that counts as an improvement.

    Example:
        >>> ml.program(..., validation=evaluate, validate_every=100,
        ...            early_stopping=ml.EarlyStopping("acc", mode="max", patience=3))
    """

    metric: str
    mode: str = "min"
    patience: int = 3
    min_delta: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in ("min", "max"):
            raise ValueError(f"EarlyStopping mode must be 'min' or 'max', got {self.mode!r}")
        if self.patience < 0 or self.min_delta < 0:
            raise ValueError("EarlyStopping needs patience >= 0 and min_delta >= 0")


def check_validation(fn: Any, every: Any, level_names: Sequence[str]) -> tuple[str, ...]:
    """Check a validation callback at trace time; return its parameter names.

    Raises:
        TraceError: ``fn`` is not callable, has a parameter mlodsl cannot fill, or
            ``validate_every`` is not a positive integer.
    """
    if not callable(fn):
        raise errors.TraceError(f"validation must be a callable, got {type(fn).__name__}")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise errors.TraceError(f"validate_every must be a positive integer (program steps), "
                                f"got {every!r}")
    return validation_params(fn, level_names)


def validation_params(fn: Callable[..., Any], level_names: Sequence[str]) -> tuple[str, ...]:
    """The parameters of a validation callback that mlodsl fills (levels, program, step)."""
    names = []
    known = [*level_names, *_RESERVED]
    for param in inspect.signature(fn).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if param.name in known:
            names.append(param.name)
        elif param.default is param.empty:
            raise errors.UnknownParameterError(
                f"the validation callback '{getattr(fn, '__name__', fn)}' has a parameter "
                f"'{param.name}' that mlodsl cannot fill.{errors.did_you_mean(param.name, known)}"
                f" It may take level names ({errors.listing(level_names)}), 'program' and "
                "'step'."
            )
    return tuple(names)


class Validator:
    """Runs the validation callback under ``torch.no_grad`` with modules in eval mode."""

    def __init__(self, fn: Callable[..., Any], every: int, params: tuple[str, ...],
                 handles: Mapping[str, Any], modules: Sequence[Any]) -> None:
        self.fn, self.every, self.params = fn, every, params
        self.handles = handles
        self.modules = [m for m in modules if isinstance(m, torch.nn.Module)]

    def __call__(self, program: Any, step: int) -> dict[str, float]:
        kwargs = {}
        for name in self.params:
            kwargs[name] = (program if name == "program" else step if name == "step"
                            else self.handles[name])
        modes = [m.training for m in self.modules]
        try:
            for module in self.modules:
                module.eval()
            with torch.no_grad():
                out = self.fn(**kwargs)
        finally:
            for module, mode in zip(self.modules, modes):
                module.train(mode)
        if not isinstance(out, Mapping):
            out = {"value": out}
        return {str(k): _number(v) for k, v in out.items()}


def _number(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.detach())
    return float(value)


class EarlyStopper:
    """Tracks the best value of the watched metric and the validations since it improved."""

    def __init__(self, rule: EarlyStopping) -> None:
        self.rule = rule
        self.best: float | None = None
        self.bad = 0

    def update(self, metrics: Mapping[str, float]) -> str | None:
        """Feed one validation; return why to stop, or ``None`` to go on."""
        rule = self.rule
        if rule.metric not in metrics:
            raise errors.MlodslError(
                f"early stopping watches '{rule.metric}', but the validation callback returned "
                f"{errors.listing(metrics)}.{errors.did_you_mean(rule.metric, metrics)}"
            )
        value = metrics[rule.metric]
        sign = 1.0 if rule.mode == "min" else -1.0
        if self.best is None or (not math.isnan(value)
                                 and sign * (self.best - value) > rule.min_delta):
            self.best, self.bad = value, 0
            return None
        self.bad += 1
        if self.bad > rule.patience:
            return (f"early stopping: '{rule.metric}' has not improved on {self.best:.6g} for "
                    f"{self.bad} validations (patience {rule.patience})")
        return None

    def state_dict(self) -> dict[str, Any]:
        """Best value and validations since."""
        return {"best": self.best, "bad": self.bad}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.best, self.bad = state["best"], state["bad"]
