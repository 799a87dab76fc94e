"""Exceptions raised by mlodsl.

Every error a user can cause derives from :class:`MlodslError`. Errors found while tracing a
program derive from :class:`TraceError`; their messages name the level, the ``file:line`` where
it was defined, what exists instead and how to fix it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MlodslError(Exception):
    """Base class of every error mlodsl raises for a mistake in user code or input."""


class TraceError(MlodslError):
    """A program could not be traced: something in the decorated levels is inconsistent."""


class AlreadyDecoratedError(TraceError):
    """``@ml.level`` was applied to something that already is a level."""


class UnknownLevelError(TraceError):
    """``upper_of`` (or ``init_from``) names a level that was not traced."""


class UnknownParameterError(TraceError):
    """A level function has a parameter that is neither ``batch``, a level, nor reserved."""


class DuplicateLevelError(TraceError):
    """Two traced levels have the same name."""


class CycleError(TraceError):
    """The ``upper_of`` relation contains a cycle."""


class MissingModuleError(TraceError):
    """A level has no ``module`` (nothing to train)."""


class MissingOptimizerError(TraceError):
    """A level has no ``optimizer``."""


class SharedParameterError(TraceError):
    """Two levels train the same parameter tensor."""


class UnknownGradMethodError(TraceError):
    """``grad=`` names no hypergradient method."""


class InvalidLevelError(TraceError):
    """A level argument has a value of the wrong type or range."""


class LevelRuntimeError(MlodslError):
    """A level produced something mlodsl cannot use while the program ran."""


class LossError(LevelRuntimeError):
    """A level function returned something that is not a scalar loss."""


class NoDependencyError(LevelRuntimeError):
    """An upper level's loss does not depend on the level(s) below it, or a lower level's
    loss does not read its upper level, so the hypergradient would be identically zero."""


class NonFiniteError(LevelRuntimeError):
    """A loss or hypergradient was NaN or infinite; nothing was applied."""


class HypergradError(LevelRuntimeError):
    """A hypergradient could not be computed (too large for ``exact``, no second-order rule)."""


class DistributedError(MlodslError):
    """A distributed run cannot go on: a rank failed or hangs, the world size does not divide a
    global batch, ranks disagree on the program, or parameters drifted apart between ranks."""


class MissingDependencyError(MlodslError, ImportError):
    """An optional dependency (graphviz, matplotlib, pandas, tensorboard, wandb) is missing.

    The message names the command that installs it.
    """


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest candidate, or ``""`` if none is close."""
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def listing(names: Iterable[str]) -> str:
    """Comma-separated names, or ``(none)``."""
    names = list(names)
    return ", ".join(names) if names else "(none)"
